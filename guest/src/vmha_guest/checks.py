"""Health check probes: command exit code, HTTP GET status, TCP connect, file freshness.

A probe runs once and says pass or fail with a short reason. It does not enforce its
own timeout: the runner in `health.py` cancels it, and each probe cleans up on
cancellation (a command's process group is killed). Nothing here blocks the event loop:
HTTP is a minimal HTTP/1.1 GET over asyncio streams, and `stat` runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from vmha_guest import __version__
from vmha_guest.config import CheckConfig, CommandCheck, FileCheck, HttpCheck, TcpCheck

T = TypeVar("T")

# After killing a timed-out command, how long to wait for it to be reaped.
KILL_WAIT_S = 2.0
# An HTTP status line longer than this is not one.
MAX_STATUS_LINE = 1024


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


Probe = Callable[[], Awaitable[CheckResult]]


def make_probe(check: CheckConfig) -> Probe:
    match check:
        case CommandCheck():
            return CommandProbe(check.command)
        case HttpCheck():
            return HttpProbe(check.url, check.expect_status)
        case TcpCheck():
            return TcpProbe(check.host, check.port)
        case FileCheck():
            return FileProbe(check.path, check.max_age_ms)


class CommandProbe:
    """Runs a command (no shell); passes on exit status 0."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    async def __call__(self) -> CheckResult:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own process group, to kill its children too
            )
        except OSError as exc:
            return CheckResult(False, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
        try:
            status = await process.wait()
        finally:
            if process.returncode is None:  # cancelled (timed out): leave nothing running
                await _kill_group(process)
        if status == 0:
            return CheckResult(True, "exit status 0")
        if status < 0:
            return CheckResult(False, f"killed by {signal.Signals(-status).name}")
        return CheckResult(False, f"exit status {status}")


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_WAIT_S):
            await process.wait()


class HttpProbe:
    """GET the URL; passes on a status in 200..399, or exactly `expect_status`."""

    def __init__(self, url: str, expect_status: int | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.expect_status = expect_status
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        self._request = (
            f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
            f"User-Agent: vmha-guest/{__version__}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii", errors="strict")
        self._ssl_context: ssl.SSLContext | None = None

    async def __call__(self) -> CheckResult:
        try:
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._context(), limit=MAX_STATUS_LINE
            )
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors
            return CheckResult(False, f"cannot connect: {_reason(exc)}")
        try:
            writer.write(self._request)
            await writer.drain()
            line = await reader.readline()
        except (OSError, ValueError) as exc:  # ValueError: a line over the limit
            return CheckResult(False, f"no valid response: {_reason(exc)}")
        finally:
            writer.close()
        status = _status_code(line)
        if status is None:
            return CheckResult(False, "no valid HTTP status line")
        if self.expect_status is not None:
            ok = status == self.expect_status
        else:
            ok = 200 <= status <= 399
        return CheckResult(ok, f"HTTP {status}")

    def _context(self) -> ssl.SSLContext | None:
        if self._tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _status_code(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


class TcpProbe:
    """Passes when host:port accepts a TCP connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def __call__(self) -> CheckResult:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            return CheckResult(False, f"cannot connect: {_reason(exc)}")
        writer.close()
        return CheckResult(True, "connected")


class FileProbe:
    """Passes when the file exists and, with `max_age_ms`, was modified recently enough."""

    def __init__(self, path: str, max_age_ms: int | None = None) -> None:
        self.path = path
        self.max_age_ms = max_age_ms
        # A stat stuck on a dead network file system is awaited again, not repeated:
        # threads must not pile up one per interval.
        self._pending: asyncio.Future[os.stat_result] | None = None

    async def __call__(self) -> CheckResult:
        if self._pending is None or self._pending.done():
            self._pending = _in_daemon_thread(lambda: os.stat(self.path))
        try:
            stat = await asyncio.shield(self._pending)
        except FileNotFoundError:
            return CheckResult(False, "missing")
        except OSError as exc:
            return CheckResult(False, f"cannot stat: {_reason(exc)}")
        if self.max_age_ms is None:
            return CheckResult(True, "exists")
        age_s = time.time() - stat.st_mtime
        return CheckResult(age_s * 1000 <= self.max_age_ms, f"modified {age_s:.1f} s ago")


def _in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """Run blocking work in a daemon thread: unlike the default executor, a stuck call
    cannot hold up the daemon's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    # Nobody may await a result that arrives after its check was cancelled; retrieve it
    # so asyncio does not log "exception was never retrieved".
    future.add_done_callback(lambda done: done.cancelled() or done.exception())

    def succeed(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def fail(error: Exception) -> None:
        if not future.done():
            future.set_exception(error)

    def run() -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop closed meanwhile
            try:
                result = work()
            except Exception as exc:
                loop.call_soon_threadsafe(fail, exc)
            else:
                loop.call_soon_threadsafe(succeed, result)

    threading.Thread(target=run, name="vmha-check", daemon=True).start()
    return future


def _reason(exc: BaseException) -> str:
    """A short reason: "Connection refused" rather than asyncio's "Connect call failed"."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, socket.gaierror):  # its errno is not an errno
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
