"""Health checks against real local targets (an HTTP server, a TCP listener, files,
commands), their timeouts, and the monitor's verdict."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vmha_guest.checks import CheckResult, CommandProbe, FileProbe, HttpProbe, TcpProbe
from vmha_guest.config import CheckConfig, parse_config
from vmha_guest.health import CheckRunner, HealthMonitor, HealthReport
from vmha_protocol.limits import HEARTBEAT_MAX_LOG_BYTES

pytestmark = pytest.mark.timeout(60)
WAIT_S = 15.0


def _check(**fields: object) -> CheckConfig:
    return parse_config({"checks": [{"name": "c", **fields}]}).checks[0]


# -- HTTP -----------------------------------------------------------------------------------


class _StatusHandler(BaseHTTPRequestHandler):
    """GET /status/NNN answers NNN; records the request line and Host header."""

    requests: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.requests.append((self.requestline, self.headers.get("Host")))
        status = int(self.path.split("/")[2].split("?")[0])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "expect", "ok"),
    [
        (200, None, True),
        (302, None, True),
        (503, None, False),
        (404, None, False),
        (503, 503, True),
        (204, 200, False),
    ],
)
async def test_http_check_judges_the_status(
    http_server: str, status: int, expect: int | None, ok: bool
) -> None:
    result = await HttpProbe(f"{http_server}/status/{status}?x=1", expect)()
    assert result == CheckResult(ok, f"HTTP {status}")


async def test_http_check_sends_a_proper_request(http_server: str) -> None:
    _StatusHandler.requests.clear()
    await HttpProbe(f"{http_server}/status/200?probe=1")()
    host = http_server.removeprefix("http://")
    assert _StatusHandler.requests == [("GET /status/200?probe=1 HTTP/1.1", host)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_http_check_fails_when_nothing_listens() -> None:
    result = await HttpProbe(f"http://127.0.0.1:{_closed_port()}/")()
    assert result == CheckResult(False, "cannot connect: Connection refused")


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Accepts, optionally answers with given bytes, never closes on its own."""
    replies: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        for reply in replies:
            writer.write(reply)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], replies
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_http_check_that_gets_no_answer_times_out(
    silent_server: tuple[int, list[bytes]],
) -> None:
    port, _ = silent_server
    check = _check(type="http", url=f"http://127.0.0.1:{port}/", timeout_ms=300)
    runner = CheckRunner(check, HttpProbe(f"http://127.0.0.1:{port}/"))
    assert await runner.run_once() == CheckResult(False, "timed out after 300 ms")


async def test_http_check_rejects_a_reply_that_is_not_http(
    silent_server: tuple[int, list[bytes]],
) -> None:
    port, replies = silent_server
    replies.append(b"SSH-2.0-OpenSSH\r\n")
    result = await HttpProbe(f"http://127.0.0.1:{port}/")()
    assert result == CheckResult(False, "no valid HTTP status line")


# -- TCP ------------------------------------------------------------------------------------


async def test_tcp_check_passes_when_a_listener_accepts() -> None:
    accepted = asyncio.Event()

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await TcpProbe("127.0.0.1", port)() == CheckResult(True, "connected")
        async with asyncio.timeout(WAIT_S):
            await accepted.wait()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_check_fails_when_nothing_listens() -> None:
    result = await TcpProbe("127.0.0.1", _closed_port())()
    assert result == CheckResult(False, "cannot connect: Connection refused")


# -- file -----------------------------------------------------------------------------------


async def test_file_check_judges_existence_and_age(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    assert await FileProbe(str(path), 10_000)() == CheckResult(False, "missing")
    path.write_text("")
    fresh = await FileProbe(str(path), 10_000)()
    assert fresh.ok and fresh.detail.startswith("modified 0.")
    old = time.time() - 60
    os.utime(path, (old, old))
    stale = await FileProbe(str(path), 10_000)()
    assert not stale.ok and stale.detail.startswith("modified 6")
    assert await FileProbe(str(path))() == CheckResult(True, "exists")  # no age limit


async def test_file_check_reports_why_it_cannot_stat(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = await FileProbe(str(not_a_dir / "below"))()
    assert result == CheckResult(False, "cannot stat: Not a directory")


# -- command --------------------------------------------------------------------------------


async def test_command_check_judges_the_exit_status() -> None:
    assert await CommandProbe(["true"])() == CheckResult(True, "exit status 0")
    assert await CommandProbe(["sh", "-c", "exit 3"])() == CheckResult(False, "exit status 3")
    assert await CommandProbe(["sh", "-c", "kill -TERM $$"])() == CheckResult(
        False, "killed by SIGTERM"
    )
    missing = await CommandProbe(["/nonexistent/check"])()
    assert missing == CheckResult(False, "cannot run /nonexistent/check: No such file or directory")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has finished; its parent may simply not reap it


async def test_command_that_overruns_its_timeout_is_killed_with_its_children(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $$ $! > {pids}; wait"
    check = _check(type="command", command=["sh", "-c", script], timeout_ms=1000)
    result = await CheckRunner(check, CommandProbe(["sh", "-c", script])).run_once()
    assert result == CheckResult(False, "timed out after 1000 ms")
    shell, child = (int(pid) for pid in pids.read_text().split())
    async with asyncio.timeout(WAIT_S):
        while _alive(shell) or _alive(child):
            await asyncio.sleep(0.05)


# -- the runner and the monitor ---------------------------------------------------------------


async def test_a_check_stuck_beyond_its_timeout_counts_as_failed() -> None:
    release = asyncio.Event()

    async def stuck() -> CheckResult:
        # Ignores cancellation, as a probe wedged in the kernel would.
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        return CheckResult(True, "finally")

    check = _check(type="command", command=["true"], interval_ms=100, timeout_ms=100)
    monitor = HealthMonitor([check], probe_factory=lambda _: stuck)
    monitor.start()
    try:
        assert monitor.report().healthy  # no result yet
        async with asyncio.timeout(WAIT_S):
            while monitor.report().healthy:
                await asyncio.sleep(0.05)
        ((name, why),) = monitor.report().failing
        assert name == "c" and why.startswith("stuck: running for ")
    finally:
        release.set()
        await monitor.stop()


async def test_a_check_late_to_run_again_is_not_stuck() -> None:
    # A paused VM resumes with its clock far ahead: the check's next run is overdue, but
    # its last result still stands until that run has had its chance.
    now = [100.0]

    async def passing() -> CheckResult:
        return CheckResult(True, "fine")

    check = _check(type="command", command=["true"], interval_ms=100, timeout_ms=100)
    runner = CheckRunner(check, passing, clock=lambda: now[0])
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(WAIT_S):
            while runner.current().detail != "fine":
                await asyncio.sleep(0.01)
        now[0] += 60.0
        assert runner.current() == CheckResult(True, "fine")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_monitor_reports_the_failing_checks(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    config = parse_config(
        {
            "checks": [
                {"name": "flag", "type": "file", "path": str(flag), "interval_ms": 50},
                {"name": "always", "type": "command", "command": ["true"], "interval_ms": 50},
            ]
        }
    )
    monitor = HealthMonitor(config.checks)
    monitor.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while (report := monitor.report()).healthy:
                await asyncio.sleep(0.02)
        assert report == HealthReport((("flag", "missing"),))
        flag.write_text("")
        async with asyncio.timeout(WAIT_S):
            while not monitor.report().healthy:
                await asyncio.sleep(0.02)
    finally:
        await monitor.stop()


def test_log_msg_names_failing_checks_within_the_limit() -> None:
    assert HealthReport().log_msg() == ""
    short = HealthReport((("web", "HTTP 503"), ("db", "timed out after 500 ms")))
    assert short.log_msg() == "failing: web (HTTP 503); db (timed out after 500 ms)"
    many = HealthReport(tuple((f"check-{i:02d}", "x" * 40) for i in range(12)))
    names_only = many.log_msg()
    assert names_only.startswith("failing: check-00, check-01, ")
    assert len(names_only.encode()) <= HEARTBEAT_MAX_LOG_BYTES
    huge = HealthReport(tuple(("é" * 30 + str(i), "x") for i in range(20)))
    assert len(huge.log_msg().encode()) <= HEARTBEAT_MAX_LOG_BYTES
