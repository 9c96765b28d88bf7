"""The local API: a unix stream socket where applications in the guest broadcast, query
the group's status, subscribe to events and vote (the format is in `local_protocol.py`).

Everything is bounded so that no application can hold the daemon up or make it grow:
request lines (64 KiB; a longer one closes the connection), clients (`max_clients`),
requests in flight per client (16), and queued events per client (`max_queued_events`;
the oldest are dropped and the client is told how many). Each client is served by two
tasks, a reader and a writer; only its own writer ever waits for it.

The socket is created with its final mode (umask set around `bind`), then given its
group. A socket file left by a daemon that died is replaced; a live one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmha_guest.config import LocalApiConfig
from vmha_guest.events import EventHub, Outbox
from vmha_guest.local_protocol import (
    MAX_REQUEST_LINE_BYTES,
    ApiError,
    BroadcastRequest,
    ErrorCode,
    StatusRequest,
    SubscribeRequest,
    Topic,
    VoteRequest,
    encode_line,
    error_reply,
    host_event,
    ok_reply,
    parse_request,
    request_id,
)
from vmha_guest.server_group import ServerGroupClient
from vmha_guest.votes import VoteBroker

log = logging.getLogger(__name__)

MAX_REQUESTS_IN_FLIGHT = 16  # per client
MAX_UNWRITTEN_REPLIES = 64  # per client; beyond, its requests are not read
CLOSE_TIMEOUT_S = 5.0


class LocalApiError(Exception):
    """The socket cannot be served; the message says where and why."""


@dataclass
class LocalApiStats:
    clients: int = 0  # accepted in total
    refused: int = 0  # over max_clients
    requests: int = 0
    failed: int = 0  # requests answered with an error


class LocalApiServer:
    def __init__(
        self,
        config: LocalApiConfig,
        hub: EventHub,
        votes: VoteBroker,
        server_group: ServerGroupClient | None,
        *,
        status_timeout_s: float,
        nack_window_s: float,
    ) -> None:
        self.config = config
        self.path = Path(config.socket)
        self._hub = hub
        self._votes = votes
        self._server_group = server_group
        self._status_timeout_s = status_timeout_s
        self._broadcast_timeout_s = status_timeout_s + nack_window_s
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._sessions: dict[asyncio.Task[Any], _Session] = {}
        self.stats = LocalApiStats()

    async def start(self) -> None:
        sock = _bind(self.path, self.config.mode, self.config.group)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(
            self._accept, sock=sock, limit=MAX_REQUEST_LINE_BYTES
        )
        log.info("serving applications on %s (mode %04o)", self.path, self.config.mode)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for session in self._sessions.values():
            session.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*self._sessions, return_exceptions=True)
                await self._server.wait_closed()
        self._server = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        # Only our own: another daemon may have taken the path over since.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._sessions) >= self.config.max_clients:
            self.stats.refused += 1
            await _refuse(reader, writer, f"{len(self._sessions)} applications are connected")
            return
        self.stats.clients += 1
        task = asyncio.current_task()
        assert task is not None
        session = _Session(self, reader, writer, _peer_name(writer))
        self._sessions[task] = session
        try:
            await session.run()
        finally:
            del self._sessions[task]

    # -- operations ----------------------------------------------------------------------

    async def perform(self, request: BroadcastRequest | StatusRequest) -> dict[str, Any]:
        server_group = self._server_group
        if server_group is None:
            raise ApiError(
                ErrorCode.MESSAGING_DISABLED,
                "server group messaging is disabled in this guest ([server_group] enabled = false)",
            )
        if isinstance(request, BroadcastRequest):
            timeout_s = _seconds(request.timeout_ms, self._broadcast_timeout_s)
            size = await server_group.broadcast(request.data, timeout_s)
            return {"sent": True, "bytes": size}
        result = await server_group.status(_seconds(request.timeout_ms, self._status_timeout_s))
        return {
            "seq": result.seq,
            "members": [member.model_dump(mode="json") for member in result.members],
            "truncated": result.truncated,
        }

    def subscribe(self, outbox: Outbox, request: SubscribeRequest) -> dict[str, Any]:
        was_voting = Topic.VOTE in outbox.topics
        outbox.topics = frozenset(request.topics)
        if request.name:
            outbox.name = request.name
        if was_voting and Topic.VOTE not in outbox.topics:
            self._votes.voter_left(outbox)
        if Topic.HOST in outbox.topics:
            outbox.offer(self._host_state())
        return {"topics": sorted(outbox.topics)}

    def vote(self, outbox: Outbox, request: VoteRequest) -> dict[str, Any]:
        self._votes.answer(outbox, request.vote_id, request.result, request.reason)
        return {"recorded": True}

    def left(self, outbox: Outbox) -> None:
        self._hub.remove(outbox)
        self._votes.voter_left(outbox)

    def _host_state(self) -> dict[str, Any]:
        if self._server_group is None:
            return host_event(False, "disabled")
        return host_event(self._server_group.connected, self._server_group.state.value)

    @property
    def hub(self) -> EventHub:
        return self._hub


class _Session:
    """One connected application: a reader and a writer task, and a task per request."""

    def __init__(
        self,
        server: LocalApiServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self.outbox = Outbox(name, server.config.max_queued_events)
        self._requests: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def stop(self) -> None:
        """End the session now (the daemon is stopping); `run` then returns."""
        for task in (*self._tasks, *self._requests):
            task.cancel()

    async def run(self) -> None:
        name = self.outbox.name
        log.debug("application connected: %s", name)
        self._server.hub.add(self.outbox)
        writing = asyncio.create_task(self._write_loop(), name=f"local api writer ({name})")
        serving = asyncio.create_task(self._serve(), name=f"local api reader ({name})")
        self._tasks = [writing, serving]
        try:
            # The writer ends when the client is gone or the outbox is closed; serving
            # ends when the client stopped sending and has its answers (or gave up).
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._server.left(self.outbox)
            self.stop()
            await asyncio.gather(*self._tasks, *self._requests, return_exceptions=True)
            self._writer.close()
            log.debug("application disconnected: %s", name)

    async def _serve(self) -> None:
        await self._read_loop()
        # The client stopped sending: answer what it asked (each request has a timeout),
        # let the writer flush the replies, then close.
        if self._requests:
            await asyncio.wait(self._requests)
        self.outbox.close()
        await asyncio.sleep(CLOSE_TIMEOUT_S)  # the writer normally finishes long before

    async def _read_loop(self) -> None:
        """Read requests until the client stops sending (EOF) or breaks the stream."""
        while True:
            await self.outbox.room_for_replies(MAX_UNWRITTEN_REPLIES)
            try:
                line = await self._reader.readline()
            except ValueError:  # longer than the limit: the rest of the stream is noise
                error = ApiError(
                    ErrorCode.INVALID_REQUEST,
                    f"request longer than {MAX_REQUEST_LINE_BYTES} bytes; closing",
                )
                self._fail(None, error)
                return
            except ConnectionError:
                return
            if not line:
                return
            if line.strip():
                self._handle(line)

    async def _write_loop(self) -> None:
        with contextlib.suppress(ConnectionError):
            while (message := await self.outbox.next()) is not None:
                self._writer.write(encode_line(message))
                await self._writer.drain()

    def _handle(self, line: bytes) -> None:
        self._server.stats.requests += 1
        try:
            request = parse_request(line)
        except ApiError as error:
            self._fail(request_id(line), error)
            return
        match request:
            case SubscribeRequest():
                self._answer(request.id, lambda: self._server.subscribe(self.outbox, request))
            case VoteRequest():
                self._answer(request.id, lambda: self._server.vote(self.outbox, request))
            case BroadcastRequest() | StatusRequest():
                if len(self._requests) >= MAX_REQUESTS_IN_FLIGHT:
                    busy = f"{len(self._requests)} requests of this connection are in flight"
                    self._fail(request.id, ApiError(ErrorCode.BUSY, busy))
                    return
                task = asyncio.create_task(self._perform(request.id, self._server.perform(request)))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)

    async def _perform(self, ident: int | str, operation: Awaitable[dict[str, Any]]) -> None:
        try:
            result = await operation
        except ApiError as error:
            self._fail(ident, error)
        except Exception:
            log.exception("request %r from %s failed", ident, self.outbox.name)
            self._fail(ident, ApiError(ErrorCode.INTERNAL, "internal error; see the daemon log"))
        else:
            self.outbox.reply(ok_reply(ident, result))

    def _answer(self, ident: int | str, operation: Callable[[], dict[str, Any]]) -> None:
        try:
            result = operation()
        except ApiError as error:
            self._fail(ident, error)
        else:
            self.outbox.reply(ok_reply(ident, result))

    def _fail(self, ident: int | str | None, error: ApiError) -> None:
        self._server.stats.failed += 1
        self.outbox.reply(error_reply(ident, error))


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str) -> None:
    """Say why, then close without a reset: read (and drop) what the client already sent,
    briefly, so that it gets to read the answer."""
    writer.write(encode_line(error_reply(None, ApiError(ErrorCode.BUSY, why))))
    with contextlib.suppress(ConnectionError, TimeoutError, ValueError):
        writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(1.0):
            while await reader.read(MAX_REQUEST_LINE_BYTES):
                pass
    writer.close()


def _seconds(timeout_ms: int | None, default_s: float) -> float:
    return default_s if timeout_ms is None else timeout_ms / 1000


def _peer_name(writer: asyncio.StreamWriter) -> str:
    """`pid 1234` from the peer's credentials, for logs and default vote reasons."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "application"
    pid, _, _ = struct.unpack("3i", creds)
    return f"pid {pid}"


def _bind(path: Path, mode: int, group: str | None) -> socket.socket:
    gid = _group_id(group)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalApiError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    _replace_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket is never more open than asked, not even between bind and chmod.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LocalApiError(f"cannot serve on {path}: {exc.strerror or exc}") from None
    return sock


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LocalApiError(f"local_api.group: no group named {group!r}") from None


def _replace_stale(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise LocalApiError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a daemon that died
        return
    except OSError as exc:
        raise LocalApiError(f"cannot check {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise LocalApiError(f"another process serves {path} (is vmha-guest already running?)")
